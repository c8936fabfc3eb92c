"""Fault injection on a real ``celery worker --pool=prefork`` subprocess (``-m crash``)."""
