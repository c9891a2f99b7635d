"""Automatic answer checks, one module per `check.kind` of a question set; runner.run picks one."""
