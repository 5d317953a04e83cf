"""Programs: the contract, per-text features, the sandbox and the built-in generator.

Never import torch at module level here: sandbox workers must start fast.
"""
