"""irno"""
