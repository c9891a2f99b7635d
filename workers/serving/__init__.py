"""The processes that serve: model worker, controller launch, FastChat compatibility, API server and its policy, web UI."""
