"""popex.decision"""
