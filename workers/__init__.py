"""The bundle's Python: loader, INT8 cache, FastChat compatibility, launch wrappers, tools."""
import os as _os

from workers.paths import logs_dir as _logs_dir

# FastChat writes a log file per module into $LOGDIR (default: the current directory) as soon as
# its server modules are imported. Every bundle entry point imports this package first.
if "LOGDIR" not in _os.environ:
    _os.environ["LOGDIR"] = str(_logs_dir())
    _logs_dir().mkdir(parents=True, exist_ok=True)
