"""Anything that predicts noise, behind one contract: ``eps(x, timestep, cond) -> eps``."""
