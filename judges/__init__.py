"""Judges: stages that score candidate responses (self-reward, pairwise, CDR). Built in later issues."""
