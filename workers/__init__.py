"""The CPU LLM bundle. One subpackage per concern; imports flow config -> models -> engine -> serving;
ops may use all of them; nothing imports tools (tests/unit/test_layout.py enforces it)."""
