"""The command line: ``localize MODEL.py --blocks K`` (``main``) and its epoch loop (``train``)."""
