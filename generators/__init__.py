"""Generators: stages that write N candidate responses per prompt. Built in later issues."""
