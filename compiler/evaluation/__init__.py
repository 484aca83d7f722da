"""Evaluation: run a compiled plan on the analog simulator (simulate) and over grids of
policies, budgets and seeds (sweep)."""
