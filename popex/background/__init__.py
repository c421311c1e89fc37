"""popex.background"""
