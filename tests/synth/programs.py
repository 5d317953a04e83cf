"""Programs shared by the policy and validation tests."""

from attnprog.synth.program import Program

NATIVE = """
import numpy as np

def program(s):
    out = np.zeros((s.n, s.n))
    out[:, 0] = 1.0
    return out
"""


def program(body: str, name: str = "program") -> Program:
    return Program(source=body.strip() + "\n", name=name)
