"""corolla"""
