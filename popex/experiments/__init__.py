"""popex.experiments"""
