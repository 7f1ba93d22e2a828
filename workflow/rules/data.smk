rule data:
    output:
        outputs("data"),
    params:
        cmd=cmd("data"),
    log:
        "logs/data/{dataset}.log",
    benchmark:
        "benchmarks/data/{dataset}.tsv"
    threads: 1
    resources:
        runtime=RUNTIME.get("data", 60),
        mem_mb=MEM_MB,
    shell:
        "{params.cmd} > {log} 2>&1"
