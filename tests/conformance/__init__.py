"""The conformance suite: one table of cases (cases.py), one adapter per door (adapters.py), declarations (doors.py)."""
