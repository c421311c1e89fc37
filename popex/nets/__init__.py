"""popex.nets"""
