"""The command line's edge for ``tasks.py``: flags, prompts, printing, exits.

Nothing here does the work, and nothing heavy is imported at import time: the ``db``
package is imported inside each function, so that ``invoke --list`` stays fast.
"""
