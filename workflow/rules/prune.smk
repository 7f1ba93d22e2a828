rule prune:
    input:
        inputs("prune"),
    output:
        outputs("prune"),
    params:
        cmd=cmd("prune"),
    log:
        "logs/prune/{dataset}/{arch}/{tm}/{pm}-{sparsity}.log",
    benchmark:
        "benchmarks/prune/{dataset}/{arch}/{tm}/{pm}-{sparsity}.tsv"
    threads: THREADS.get("prune", 2)
    resources:
        gpu=GPUS,
        runtime=RUNTIME.get("prune", 720),
        mem_mb=MEM_MB,
    shell:
        "export OMP_NUM_THREADS={threads}; {params.cmd} > {log} 2>&1"
