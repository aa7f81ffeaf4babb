-- Set one message aside in the dead-letter store and drop its unacknowledged record, in
-- one step: it is never in neither place, and never comes back from the restore sweep.
--
-- KEYS: dead-letter hash, dead-letter index, unacked hash, unacked index, deliveries hash,
--       owner hash, this consumer's held set
-- ARGV: entry id, entry JSON, now, dead-letter store bound, delivery tag ('' for none)
add_dead_letter(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
if ARGV[5] ~= '' then
    forget_delivery(KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[5])
end
return 1
