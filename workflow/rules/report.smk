rule report:
    input:
        [path for job in plan.jobs(config) if job.stage == "report" for path in job.deps],
    output:
        [path for job in plan.jobs(config) if job.stage == "report" for path in job.outputs],
    params:
        cmd=cmd("report"),
    log:
        f"{ROOT}logs/report.log",
    benchmark:
        f"{ROOT}benchmarks/report.tsv"
    threads: 1
    resources:
        runtime=RUNTIME.get("report", 30),
        mem_mb=MEM_MB,
    shell:
        "{params.cmd} > {log} 2>&1"
