rule prune:
    input:
        inputs("prune"),
    output:
        outputs("prune"),
    params:
        cmd=cmd("prune"),
    log:
        f"{ROOT}logs/prune/{{dataset}}/{{arch}}/{{tm}}/{{run}}.log",
    benchmark:
        f"{ROOT}benchmarks/prune/{{dataset}}/{{arch}}/{{tm}}/{{run}}.tsv"
    threads: THREADS.get("prune", 2)
    resources:
        gpu=GPUS,
        runtime=RUNTIME.get("prune", 720),
        mem_mb=MEM_MB,
    shell:
        "export OMP_NUM_THREADS={threads}; {params.cmd} > {log} 2>&1"
