"""What a reader opens: figures of the knowledge-neuron and attention results (`figures`, `attention_figures`),
sentences generated from the numbers (`findings`), the Markdown report with its console tables (`markdown`), and
the causal-tracing heatmaps, AIE curves (`trace_figures`), table and report section (`trace_report`).

May import `common`, `facts`, `models`, the method modules and `analysis`; never `editing` or `run`. It computes
nothing on a model: it only shows numbers the layers below produced.
"""
