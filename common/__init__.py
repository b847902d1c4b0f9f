"""What every layer shares: the one user-facing error type (`errors`), turning a prompt and its answer into token
ids (`tokens`), and writing results atomically with their provenance (`outputs`: JSON, npz, text, console tables).

The bottom of the import graph: it imports no other package of this project.
"""
