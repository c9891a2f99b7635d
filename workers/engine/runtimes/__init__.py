"""The runtimes a model can run on, one package each, behind one interface (base.py); registry.py picks one."""
