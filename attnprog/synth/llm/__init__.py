"""The LLM layer: attention summaries, prompts, the chat client and its reply cache, reply parsing,
refinement and the synthesiser that ties them together. Imports only synth's contract,
features and the public runtime entry points."""
