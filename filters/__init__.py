"""Filters: stages that keep or drop rows, each with a reason per dropped row.

Each filter is also a plain function on Arrow tables. Example: from curate.filters.text import LengthFilter
"""
