"""Editing knowledge through knowledge neurons (Dai et al. 2022, section 6): the edits on value slots and their exact
undo (`edits`), their measurement against random-slot controls (`evaluation`), and the `edit` stage of a run with its
JSON, table, figure and report section (`stage`).

May import `common`, `facts`, `sources`, `models`, the method modules, `analysis` and `report`; never `run`.
"""
