"""Study: the read-only verbs that measure adapters — evaluate, generate, compare (and sweep), analyze (+ report),
lexical (words-only controls) and report (training curves). May import: data/, train/ (never its trainer: these
verbs never import TRL) and the root modules. Never release/.
"""
