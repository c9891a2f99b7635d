"""The deployment description and the base every layer stands on: schema, rules, YAML loading, paths, file utilities."""
