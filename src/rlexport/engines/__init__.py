"""Reference engines run out of process: vLLM (generate / pool) for verify and the tests."""
