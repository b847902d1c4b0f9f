"""Where facts and texts come from besides the built-in table of `facts.py`: ParaRel read from the user's own copy
(`pararel`) and the neutral sentences that editing measures perplexity on (`neutral_text`).

May import `common` and the top-level `facts` module; nothing that computes on a model.
"""
