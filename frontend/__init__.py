"""amxc.frontend"""
