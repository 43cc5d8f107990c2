"""The family matrix: every model family x every lowbit path, run, not claimed.

``tests/families/cases.py`` defines the cells and runs them, ``render.py`` writes
``docs/models.md`` from the results (``python -m tests.families.render``), and
``test_matrix.py`` checks that every cell still gives what the doc says.
"""
