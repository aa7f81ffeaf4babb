"""The sandbox runtime: what runs inside a warm sandbox's zygote and its runs.

Standard library only, and no import of pluginpool outside this package (relative imports
only): a zygote is a fresh interpreter, possibly of another environment, that loads this
package by path (guardians.bootstrap) under the name `pluginpool_sandbox_runtime`.
"""
