"""The way of a job: the submission service, admission, the scheduler, retries, failures, the cluster, what a driver left, job paths and logs."""
