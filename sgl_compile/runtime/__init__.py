"""Runtime: KV pool, radix cache, scheduler, model runner, sampler, engine."""
