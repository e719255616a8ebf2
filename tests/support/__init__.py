"""Helpers shared by the tests: throwaway databases and real subprocesses."""
