"""popex.runtime"""
