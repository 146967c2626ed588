"""runtime/compiler"""
