"""tuner/ship"""
