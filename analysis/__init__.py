"""What is computed from the knowledge-neuron scores of one model: the per-fact files that let a stage resume (`cache`),
the knowledge stage with its per-fact cache and files (`stage`), the score files of each process and reading them
back (`scores`), overlap statistics of neuron sets across facts, exact over every pair from a sparse fact x neuron
matrix (`overlap`), their permutation test and bootstrap over facts (`significance`), the causal suppress / amplify
checks against random-neuron controls (`interventions`), and the causal-tracing stage with its six-group summary and
the knowledge-neuron cross-check (`tracing`).

May import `common`, `facts`, `models` and the public method modules (`knowledge_neurons`, `attention_neurons`,
`causal_tracing`);
never `report`, `editing` or `run`.
"""
