"""The conversations every family is asked in the fidelity tests (fidelity_cases, test_families, neural_speed_cases).
System-less families refuse "system": their template says so."""

CHAT_CASES = {
    "single": [{"role": "user", "content": "Hello"}],
    "multi": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
              {"role": "user", "content": "And 3+3?"}],
    "system": [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Hello"}],
    "chinese": [{"role": "user", "content": "你好，请介绍一下你自己。"}],
}
