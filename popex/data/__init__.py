"""popex.data"""
