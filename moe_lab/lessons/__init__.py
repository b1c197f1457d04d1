"""Longer helpers of the notebooks, one module per notebook (`nbNN_<topic>.py`).

A notebook cell stays short; code that would make it long lives here, where a reader can open it
and the tests can import it. Nothing here is part of moe_lab's API.
"""
