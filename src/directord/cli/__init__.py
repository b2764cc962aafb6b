"""The command line: the only package that parses argv, prints, or picks exit codes.

Exit codes: 0 success; 1 a job failed (``--wait``) or a runtime error;
2 bad input (options, config, orchestration); 3 the server is unreachable.
"""
