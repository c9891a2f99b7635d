"""Operating the bundle: start/stop/status/restart, supervisord config and RPC."""
