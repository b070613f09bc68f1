"""Sharing grown checkpoints: model cards with growth provenance (card.py) and Hub upload (push.py).

Deliberately empty: `growkit.hub.push` must stay the module (importing the function here would shadow it).
"""
