"""What every layer shares: the one user-facing error type (`errors`), turning a prompt and its answer into token
ids (`tokens`), writing results atomically with their provenance (`outputs`: JSON, npz, text, console tables),
the seeded samples of the stages that would grow with the square of the facts (`sampling`), and the C
allocator's setting for large tensors (`allocator`).

The bottom of the import graph: it imports no other package of this project.
"""
