"""Feedback from users: the store of answers and labels (store.py) and the worker side that writes it (recorder.py)."""
