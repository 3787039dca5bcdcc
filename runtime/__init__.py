"""amxc.runtime"""
