"""tuner/agent"""
