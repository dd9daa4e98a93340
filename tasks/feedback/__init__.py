"""Feedback without hand-made pairs: Constitutional AI (critique, revision, AI preference labels)."""
